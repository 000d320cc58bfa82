"""Specs -> Envoy's v3 protobuf resources (the generated API from ``xds-protos``), and Envoy's bootstrap.

The shell around ``controlplane.translate``: nothing here decides anything. Resources are built from a
template per kind (``CopyFrom`` of a prepared message is several times cheaper than building one field by
field), serialized deterministically, and versioned by a hash of their bytes, so the same input always
gives the same version -- an agent that restarts finds Envoy already holding every version it would send.
"""

from __future__ import annotations

import hashlib
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, substitution_format_string_pb2
from envoy.config.core.v3 import extension_pb2 as envoy_extension_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.set_filter_state.v3 import set_filter_state_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, wrappers_pb2
from google.protobuf.message import Message
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from controlplane.translate import Chain, ClusterSpec, LoadSpec
from redirector.model import Family, Key
from shared import constants as c

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)  # the order Envoy must receive them in (warming)
SHORT = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}

CLUSTER_HEADER = "x-lightpath-cluster"  # set by Envoy before routing, removed before the request leaves
SOL_SOCKET, SO_MARK = 1, 36  # linux/socket.h
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
CONNECT_TIMEOUT_S = 5  # the original Lightpath's upstream-connect-timeout default


def listener_name(family: Family) -> str:
    return f"lightpath_ipv{family}"


def route_name(family: Family) -> str:
    return f"lightpath_http_ipv{family}"


def version_of(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def pack(message: Message) -> any_pb2.Any:
    wrapped = any_pb2.Any()
    wrapped.Pack(message)
    return wrapped


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


# -- clusters and endpoints ----------------------------------------------------------------------------

def _cluster_template(protocol: str) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(type=cluster_pb2.Cluster.EDS, lb_policy=cluster_pb2.Cluster.LEAST_REQUEST)
    cluster.connect_timeout.seconds = CONNECT_TIMEOUT_S
    cluster.eds_cluster_config.eds_config.CopyFrom(_ads())
    if protocol == "h2c":
        options = http_protocol_options_pb2.HttpProtocolOptions()
        options.explicit_http_config.http2_protocol_options.SetInParent()
        cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(options))
    return cluster


_CLUSTER_TEMPLATES = {p: _cluster_template(p) for p in ("tcp", "http", "h2c")}


def _affinity(template: cluster_pb2.Cluster) -> cluster_pb2.Cluster:
    """ClientIP session affinity: a ring hash over the client address (the chains hash on source_ip)."""
    hashed = cluster_pb2.Cluster()
    hashed.CopyFrom(template)
    hashed.lb_policy = cluster_pb2.Cluster.RING_HASH
    return hashed


_AFFINITY_TEMPLATES = {p: _affinity(t) for p, t in _CLUSTER_TEMPLATES.items()}


def cluster(spec: ClusterSpec) -> cluster_pb2.Cluster:
    built = cluster_pb2.Cluster()
    built.CopyFrom((_AFFINITY_TEMPLATES if spec.affinity else _CLUSTER_TEMPLATES)[spec.protocol])
    built.name = spec.name
    built.alt_stat_name = spec.stat_name
    return built


def load_assignment(spec: LoadSpec) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=spec.name)
    if spec.endpoints:
        group = cla.endpoints.add()
        for ip, port in spec.endpoints:
            lb = group.lb_endpoints.add()
            lb.endpoint.address.socket_address.address = ip
            lb.endpoint.address.socket_address.port_value = port
    return cla


# -- the listener per family ---------------------------------------------------------------------------

def _typed(name: str, message: Message) -> extension_pb2.TypedExtensionConfig:
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=pack(message))


def _format(text: str) -> substitution_format_string_pb2.SubstitutionFormatString:
    return substitution_format_string_pb2.SubstitutionFormatString(
        text_format_source=base_pb2.DataSource(inline_string=text))


def _destination(family: Family, nodeport: bool) -> str:
    """What the chain names the cluster by: the original destination, or ``nodeport<family>:<port>``."""
    return f"nodeport{family}:%DOWNSTREAM_LOCAL_PORT%" if nodeport else "%DOWNSTREAM_LOCAL_ADDRESS%"


def _tcp_chain(family: Family, nodeport: bool) -> listener_components_pb2.FilterChain:
    state = set_filter_state_pb2.Config()
    value = state.on_new_connection.add()
    value.object_key = "envoy.tcp_proxy.cluster"
    value.format_string.CopyFrom(_format(_destination(family, nodeport)))
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix="lightpath_tcp", cluster="lightpath_no_cluster")
    proxy.hash_policy.add().source_ip.SetInParent()  # used by ring-hash (session affinity) clusters only
    chain = listener_components_pb2.FilterChain(name="tcp-nodeport" if nodeport else "tcp")
    chain.filters.add(name="envoy.filters.network.set_filter_state", typed_config=pack(state))
    chain.filters.add(name="envoy.filters.network.tcp_proxy", typed_config=pack(proxy))
    return chain


def _http_chain(family: Family, nodeport: bool) -> listener_components_pb2.FilterChain:
    mutation = header_mutation_pb2.HeaderMutation()
    append = mutation.mutations.add().append
    append.header.key = CLUSTER_HEADER
    append.header.value = _destination(family, nodeport)
    append.append_action = append.OVERWRITE_IF_EXISTS_OR_ADD  # a client's own header never picks the cluster
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="lightpath_http", codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        server_header_transformation=hcm_pb2.HttpConnectionManager.PASS_THROUGH)
    manager.use_remote_address.value = True
    manager.rds.route_config_name = route_name(family)
    manager.rds.config_source.CopyFrom(_ads())
    manager.early_header_mutation_extensions.append(envoy_extension_pb2.TypedExtensionConfig(
        name="envoy.http.early_header_mutation.header_mutation", typed_config=pack(mutation)))
    manager.upgrade_configs.add(upgrade_type="websocket")
    manager.http_filters.add(name="envoy.filters.http.router",
                             typed_config=pack(router_pb2.Router(suppress_envoy_headers=True)))
    chain = listener_components_pb2.FilterChain(name="http-nodeport" if nodeport else "http")
    chain.filters.add(name="envoy.filters.network.http_connection_manager", typed_config=pack(manager))
    return chain


def _chain_action(chain: str) -> matcher_pb2.Matcher.OnMatch:
    return matcher_pb2.Matcher.OnMatch(action=_typed(chain, wrappers_pb2.StringValue(value=chain)))


_DESTINATION_IP = _typed("destination-ip", network_inputs_pb2.DestinationIPInput())
_DESTINATION_PORT = _typed("destination-port", network_inputs_pb2.DestinationPortInput())
_SENTINEL_IP: dict[Family, str] = {4: "0.0.0.0", 6: "::"}
_ACTIONS = {name: _chain_action(name) for name in ("tcp", "http", "tcp-nodeport", "http-nodeport")}


class ListenerBuilder:
    """The listener of one family, its matcher kept in step with the keys one change at a time (a 20,000
    entry map is never rebuilt for one Service)."""

    def __init__(self, family: Family, port: int = c.DEFAULT_PROXY_PORT) -> None:
        self.family = family
        self.listener = listener_pb2.Listener(name=listener_name(family))
        address = self.listener.address.socket_address
        address.address, address.port_value = ("0.0.0.0" if family == 4 else "::"), port
        self.listener.listener_filters.add(name="envoy.filters.listener.original_dst",
                                           typed_config=pack(original_dst_pb2.OriginalDst()))
        for nodeport in (False, True):
            self.listener.filter_chains.append(_tcp_chain(family, nodeport))
            self.listener.filter_chains.append(_http_chain(family, nodeport))
        tree = self.listener.filter_chain_matcher.matcher_tree
        tree.input.CopyFrom(_DESTINATION_IP)
        tree.exact_match_map.SetInParent()
        ports = self.listener.filter_chain_matcher.on_no_match.matcher.matcher_tree
        ports.input.CopyFrom(_DESTINATION_PORT)
        ports.exact_match_map.SetInParent()
        self._ips = tree.exact_match_map.map
        self._nodeports = ports.exact_match_map.map
        # Envoy refuses an empty map: one entry that no connection can match (destination port 0).
        sentinel = self._ips[_SENTINEL_IP[family]].matcher.matcher_tree
        sentinel.input.CopyFrom(_DESTINATION_PORT)
        sentinel.exact_match_map.map["0"].CopyFrom(_ACTIONS["tcp"])
        self._nodeports["0"].CopyFrom(_ACTIONS["tcp-nodeport"])
        self.keys: dict[Key, Chain] = {}

    def set(self, key: Key, chain: Chain) -> None:
        if self.keys.get(key) == chain:
            return
        self.keys[key] = chain
        if key.ip is None:
            self._nodeports[str(key.port)].CopyFrom(_ACTIONS[f"{chain}-nodeport"])
            return
        per_ip = self._ips[key.ip].matcher.matcher_tree
        if not per_ip.HasField("input"):
            per_ip.input.CopyFrom(_DESTINATION_PORT)
        per_ip.exact_match_map.map[str(key.port)].CopyFrom(_ACTIONS[chain])

    def remove(self, key: Key) -> None:
        if self.keys.pop(key, None) is None:
            return
        if key.ip is None:
            del self._nodeports[str(key.port)]
            return
        ports = self._ips[key.ip].matcher.matcher_tree.exact_match_map.map
        del ports[str(key.port)]
        if not ports and key.ip != _SENTINEL_IP[key.family]:
            del self._ips[key.ip]


def route_configuration(family: Family) -> route_pb2.RouteConfiguration:
    """The HTTP routes: every request goes to the cluster its connection's destination names."""
    config = route_pb2.RouteConfiguration(name=route_name(family))
    host = config.virtual_hosts.add(name="lightpath", domains=["*"])
    route = host.routes.add()
    route.match.prefix = "/"
    route.route.cluster_header = CLUSTER_HEADER
    route.route.timeout.SetInParent()  # 0: no request timeout, as through kube-proxy
    route.route.hash_policy.add().connection_properties.source_ip = True  # ring-hash (affinity) clusters only
    route.request_headers_to_remove.append(CLUSTER_HEADER)
    return config


def serialize(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)


def resource(type_url: str, data: bytes) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=data)


# -- bootstrap -----------------------------------------------------------------------------------------

STAT_PATTERNS = (
    # Per Service port: traffic, errors and health, no per-cluster internals (those dominate Envoy's memory).
    r"^cluster\.[^.]+\.(upstream_cx_(total|active|connect_fail|connect_timeout|destroy_remote_with_active_rq)"
    r"|upstream_rq_(total|active|[1-5]xx|timeout|retry|retry_success|pending_overflow)|membership_(total|healthy)"
    r"|outlier_detection\.ejections_active)$",
)
STAT_PREFIXES = ("server.", "listener_manager.", "cluster_manager.", "control_plane.", "listener.", "http.lightpath_http.",
                 "tcp.lightpath_tcp.", "runtime.")


def bootstrap(*, node_id: str, xds_socket: str | None = None, xds_address: tuple[str, int] | None = None,
              admin_port: int = c.ENVOY_ADMIN_PORT, mark: int | None = c.DEFAULT_PROXY_MARK,
              max_connections: int = 1_000_000) -> dict[str, Any]:
    """Envoy's bootstrap (JSON): everything over ADS from the agent, admin on loopback, only the stats
    operators need. ``mark``: set on every upstream socket so the agent never redirects Envoy's own
    connections (needs CAP_NET_ADMIN; the shipped DaemonSet runs Envoy as the UID the agent exempts instead,
    ``mark=None``). ``deploy/proxy`` ships exactly this (``lightpath-redirector bootstrap``; a test compares)."""
    if (xds_socket is None) == (xds_address is None):
        raise ValueError("give exactly one of xds_socket and xds_address")
    if xds_socket is not None:
        target: dict[str, Any] = {"pipe": {"path": xds_socket}}
    else:
        assert xds_address is not None
        target = {"socket_address": {"address": xds_address[0], "port_value": xds_address[1]}}
    ads = {"ads": {}, "resource_api_version": "V3"}
    boot: dict[str, Any] = {
        "node": {"id": node_id, "cluster": "lightpath"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "DELTA_GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "lightpath_xds"}}]},
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {"clusters": [{
            "name": "lightpath_xds", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {HTTP_PROTOCOL_OPTIONS: {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {
                    "connection_keepalive": {"interval": "5s", "timeout": "5s"}}}}},
            "load_assignment": {"cluster_name": "lightpath_xds", "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": target}}]}]},
        }]},
        "stats_config": {"stats_matcher": {"inclusion_list": {"patterns": [
            *({"safe_regex": {"regex": p}} for p in STAT_PATTERNS), *({"prefix": p} for p in STAT_PREFIXES)]}}},
        # A safety net against running out of file descriptors, not a limit kube-proxy would have.
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                                      "DownstreamConnectionsConfig",
                             "max_active_downstream_connections": max_connections}}]},
    }
    if mark is not None:
        boot["cluster_manager"] = {"upstream_bind_config": {"socket_options": [
            {"level": SOL_SOCKET, "name": SO_MARK, "int_value": mark, "state": "STATE_PREBIND"}]}}
    return boot

