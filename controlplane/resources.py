"""Specs -> Envoy's v3 protobuf resources (the generated API from ``xds-protos``), and Envoy's bootstrap.

The shell around ``controlplane.translate``: nothing here decides anything. Resources are built from a
template per kind (``CopyFrom`` of a prepared message is several times cheaper than building one field by
field), serialized deterministically, and versioned by a hash of their bytes, so the same input always
gives the same version -- an agent that restarts finds Envoy already holding every version it would send.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, substitution_format_string_pb2
from envoy.config.core.v3 import extension_pb2 as envoy_extension_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.on_demand.v3 import on_demand_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.original_src.v3 import original_src_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.set_filter_state.v3 import set_filter_state_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from controlplane import l7
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
NO_ACCESS_LOG = "lightpath.no_access_log"  # cluster metadata key: the access logs skip its traffic


def listener_name(family: Family, transparent: bool = False) -> str:
    """The listener of one family; ``transparent``: the one whose upstream connections keep the client's
    source address (docs/conformance.md row 6)."""
    return f"lightpath_ipv{family}_transparent" if transparent else f"lightpath_ipv{family}"


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


def _ms(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _breaker(threshold: circuit_breaker_pb2.CircuitBreakers.Thresholds, breaker: l7.Breaker) -> None:
    threshold.max_connections.value = breaker.max_connections
    threshold.max_pending_requests.value = breaker.max_pending_requests
    threshold.max_requests.value = breaker.max_requests
    threshold.max_retries.value = breaker.max_retries
    threshold.track_remaining = breaker.track_remaining


def _outlier(protocol: str, outlier: l7.Outlier) -> outlier_detection_pb2.OutlierDetection:
    """HTTP: consecutive 5xx and gateway failures (a refused connection counts as a 503). TCP: there is no
    response, so connection failures are counted on their own (local-origin errors)."""
    built = outlier_detection_pb2.OutlierDetection()
    built.interval.CopyFrom(_ms(outlier.interval_ms))
    built.base_ejection_time.CopyFrom(_ms(outlier.base_ejection_ms))
    built.max_ejection_time.CopyFrom(_ms(outlier.max_ejection_ms))
    built.max_ejection_percent.value = outlier.max_ejection_percent
    # Envoy ejects a host only while (ejected + 1) / hosts <= the percent: with the original default of 10 %
    # and fewer than 10 backends, nothing would ever be ejected (measured: a dead backend of three kept its
    # share, docs/performance.md "L7 resilience" (d)). One host may always go.
    built.always_eject_one_host.value = True
    if protocol == "tcp":
        built.split_external_local_origin_errors = True
        built.consecutive_local_origin_failure.value = outlier.consecutive_gateway_failure
        built.enforcing_consecutive_local_origin_failure.value = 100
    else:
        built.consecutive_5xx.value = outlier.consecutive_5xx
        built.consecutive_gateway_failure.value = outlier.consecutive_gateway_failure
        built.enforcing_consecutive_gateway_failure.value = 100  # Envoy's default is 0: counted, never enforced
    return built


@functools.lru_cache(maxsize=256)
def _cluster_base(protocol: str, affinity: bool, options: l7.ClusterOptions) -> cluster_pb2.Cluster:
    """One prepared cluster per distinct (protocol, affinity, options): most Services share the defaults."""
    built = cluster_pb2.Cluster()
    built.CopyFrom(_CLUSTER_TEMPLATES[protocol])
    # ClientIP session affinity wins: a ring hash over the client address (the chains hash on source_ip).
    built.lb_policy = cluster_pb2.Cluster.RING_HASH if affinity else cluster_pb2.Cluster.LbPolicy.Value(options.lb_policy)
    built.connect_timeout.CopyFrom(_ms(options.connect_timeout_ms))
    _breaker(built.circuit_breakers.thresholds.add(priority=base_pb2.DEFAULT), options.default_priority)
    _breaker(built.circuit_breakers.thresholds.add(priority=base_pb2.HIGH), options.high_priority)
    built.outlier_detection.CopyFrom(_outlier(protocol, options.outlier))
    if protocol != "tcp" and options.upstream_idle_timeout_ms is not None:
        http = http_protocol_options_pb2.HttpProtocolOptions()
        if protocol == "h2c":
            http.explicit_http_config.http2_protocol_options.SetInParent()
        else:
            http.explicit_http_config.http_protocol_options.SetInParent()
        http.common_http_protocol_options.idle_timeout.CopyFrom(_ms(options.upstream_idle_timeout_ms))
        built.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(http))
    if not options.access_log:
        built.metadata.filter_metadata[NO_ACCESS_LOG].CopyFrom(struct_pb2.Struct())
    return built


def cluster(spec: ClusterSpec) -> cluster_pb2.Cluster:
    built = cluster_pb2.Cluster()
    built.CopyFrom(_cluster_base(spec.protocol, spec.affinity, spec.options))
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


# Access logs (the option ``access-log``, on by default): JSON lines on Envoy's stdout. The chains are shared,
# so a Service turns its log off through its clusters' metadata, which a CEL filter reads per request or
# connection (a connection that never reached a cluster is logged).
ACCESS_LOG_FILTER = (f"!(has(xds.cluster_metadata) && has(xds.cluster_metadata.filter_metadata) "
                     f"&& '{NO_ACCESS_LOG}' in xds.cluster_metadata.filter_metadata)")
HTTP_LOG_FIELDS = {
    "start": "%START_TIME%", "client": "%DOWNSTREAM_REMOTE_ADDRESS%", "destination": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "method": "%REQ(:METHOD)%", "path": "%REQ(:PATH)%", "protocol": "%PROTOCOL%", "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%", "details": "%RESPONSE_CODE_DETAILS%", "received": "%BYTES_RECEIVED%",
    "sent": "%BYTES_SENT%", "duration_ms": "%DURATION%", "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%", "upstream": "%UPSTREAM_HOST%", "service": "%UPSTREAM_CLUSTER%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}
TCP_LOG_FIELDS = {
    "start": "%START_TIME%", "client": "%DOWNSTREAM_REMOTE_ADDRESS%", "destination": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "flags": "%RESPONSE_FLAGS%", "received": "%BYTES_RECEIVED%", "sent": "%BYTES_SENT%", "duration_ms": "%DURATION%",
    "upstream": "%UPSTREAM_HOST%", "service": "%UPSTREAM_CLUSTER%",
}


def _access_log(fields: dict[str, str]) -> accesslog_pb2.AccessLog:
    form = substitution_format_string_pb2.SubstitutionFormatString()
    form.json_format.update(fields)
    log = accesslog_pb2.AccessLog(name="envoy.access_loggers.stdout",
                                  typed_config=pack(stream_pb2.StdoutAccessLog(log_format=form)))
    log.filter.extension_filter.name = "envoy.access_loggers.extension_filters.cel"
    log.filter.extension_filter.typed_config.CopyFrom(pack(cel_pb2.ExpressionFilter(expression=ACCESS_LOG_FILTER)))
    return log


# How long a connection or request waits for its cluster when Envoy fetches it on first use (on-demand
# clusters): long enough to ride out an agent restart (Envoy reconnects within ~1-2 s), short of a client's
# own connect timeout.
ON_DEMAND_TIMEOUT_S = 10


def _tcp_chain(family: Family, nodeport: bool, on_demand: bool = False) -> listener_components_pb2.FilterChain:
    state = set_filter_state_pb2.Config()
    value = state.on_new_connection.add()
    value.object_key = "envoy.tcp_proxy.cluster"
    value.format_string.CopyFrom(_format(_destination(family, nodeport)))
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix="lightpath_tcp", cluster="lightpath_no_cluster")
    proxy.hash_policy.add().source_ip.SetInParent()  # used by ring-hash (session affinity) clusters only
    proxy.access_log.append(_access_log(TCP_LOG_FIELDS))
    if on_demand:  # a cluster Envoy does not hold yet is asked for over ADS (on-demand CDS)
        proxy.on_demand.odcds_config.CopyFrom(_ads())
        proxy.on_demand.timeout.FromSeconds(ON_DEMAND_TIMEOUT_S)
    chain = listener_components_pb2.FilterChain(name="tcp-nodeport" if nodeport else "tcp")
    chain.filters.add(name="envoy.filters.network.set_filter_state", typed_config=pack(state))
    chain.filters.add(name="envoy.filters.network.tcp_proxy", typed_config=pack(proxy))
    return chain


def _http_chain(family: Family, nodeport: bool, on_demand: bool = False) -> listener_components_pb2.FilterChain:
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
    manager.access_log.append(_access_log(HTTP_LOG_FIELDS))
    if on_demand:  # before the router: the route's cluster (by the cluster header) is fetched if missing
        fetch = on_demand_pb2.OnDemand()
        fetch.odcds.source.CopyFrom(_ads())
        fetch.odcds.timeout.FromSeconds(ON_DEMAND_TIMEOUT_S)
        manager.http_filters.add(name="envoy.filters.http.on_demand", typed_config=pack(fetch))
    manager.http_filters.add(name="envoy.filters.http.router",
                             typed_config=pack(router_pb2.Router(suppress_envoy_headers=True)))
    chain = listener_components_pb2.FilterChain(name="http-nodeport" if nodeport else "http")
    chain.filters.add(name="envoy.filters.network.http_connection_manager", typed_config=pack(manager))
    return chain


def _chain_action(chain: str) -> matcher_pb2.Matcher.OnMatch:
    return matcher_pb2.Matcher.OnMatch(action=_typed(chain, wrappers_pb2.StringValue(value=chain)))


_DESTINATION_IP = _typed("destination-ip", network_inputs_pb2.DestinationIPInput())
_DESTINATION_PORT = _typed("destination-port", network_inputs_pb2.DestinationPortInput())
_SENTINEL_PORT = 0  # no connection has destination port 0
_ACTIONS = {name: _chain_action(name) for name in ("tcp", "http", "tcp-nodeport", "http-nodeport")}
_Changed = set[str] | None  # a port's changed addresses, None: build the port's entry again (ListenerBuilder.set hides set)


class ListenerBuilder:
    """The listener of one family, its matcher kept in step with the keys.

    The matcher reads the destination port first (port -> chain, or port -> destination IP -> chain). Per
    port, the chain most of its addresses take is the port's *default*, and only the addresses that take
    the other chain are listed: the kernel redirects exact keys only, so no connection reaches the listener
    for an address that is no key on that port (and if one did, no cluster is named after it). A port that
    is also a NodePort is the exception: a NodePort reaches every node address, which an external or
    LoadBalancer IP may be, so that port lists every address with a key on it and falls through to the
    NodePort chain. Envoy rebuilds the whole matcher on every listener update (~6 µs an entry), so the
    matcher holds one entry per port plus the exceptions, and a Service whose ports take their ports'
    default chains leaves the listener's bytes, and so its version, unchanged.

    Changes are applied when ``listener`` is read, once per changed port: one address listed or unlisted,
    or the port's entry built again when its fallback changed (a batch of changes never rebuilds a port
    more than once)."""

    def __init__(self, family: Family, port: int = c.DEFAULT_PROXY_PORT, *, on_demand: bool = False,
                 transparent_mark: int | None = None) -> None:
        """``on_demand``: the chains ask Envoy to fetch a missing cluster on first use (``--envoy-clusters``).
        ``transparent_mark``: build the transparent listener instead (``--preserve-source-ip``): Envoy's
        ``original_src`` listener filter opens each upstream connection from the client's own address
        (IP_TRANSPARENT, so Envoy needs CAP_NET_ADMIN) with this socket mark, which the agent's kernel rules
        use to route the backend's replies back to Envoy (redirector.blocks)."""
        self.family = family
        self.transparent = transparent_mark is not None
        self._listener = listener = listener_pb2.Listener(name=listener_name(family, self.transparent))
        address = listener.address.socket_address
        address.address, address.port_value = ("0.0.0.0" if family == 4 else "::"), port
        listener.listener_filters.add(name="envoy.filters.listener.original_dst",
                                      typed_config=pack(original_dst_pb2.OriginalDst()))
        if transparent_mark is not None:
            listener.listener_filters.add(name="envoy.filters.listener.original_src",
                                          typed_config=pack(original_src_pb2.OriginalSrc(mark=transparent_mark)))
        for nodeport in (False, True):
            listener.filter_chains.append(_tcp_chain(family, nodeport, on_demand))
            listener.filter_chains.append(_http_chain(family, nodeport, on_demand))
        tree = listener.filter_chain_matcher.matcher_tree
        tree.input.CopyFrom(_DESTINATION_PORT)
        self._ports = tree.exact_match_map.map
        self.keys: dict[Key, Chain] = {}
        self._addresses: dict[int, dict[str, Chain]] = {}  # port -> address -> chain (keys with an IP)
        self._counts: dict[int, dict[Chain, int]] = {}  # port -> chain -> how many addresses take it
        self._nodeports: dict[int, Chain] = {}
        self._fallbacks: dict[int, str] = {}  # port -> the action its entry gives an unlisted address
        self._dirty: dict[int, _Changed] = {}
        self._build(_SENTINEL_PORT)  # Envoy refuses an empty map

    @property
    def listener(self) -> listener_pb2.Listener:
        """The listener with every change so far."""
        for port, ips in self._dirty.items():
            self._flush(port, ips)
        self._dirty.clear()
        return self._listener

    def set(self, key: Key, chain: Chain) -> None:
        old = self.keys.get(key)
        if old == chain:
            return
        self.keys[key] = chain
        if key.ip is None:
            self._nodeports[key.port] = chain
            self._dirty[key.port] = None
            return
        counts = self._counts.setdefault(key.port, {})
        if old is not None:
            counts[old] -= 1
        counts[chain] = counts.get(chain, 0) + 1
        self._addresses.setdefault(key.port, {})[key.ip] = chain
        self._touch(key.port, key.ip)

    def remove(self, key: Key) -> None:
        old = self.keys.pop(key, None)
        if old is None:
            return
        if key.ip is None:
            del self._nodeports[key.port]
            self._dirty[key.port] = None
            return
        addresses = self._addresses[key.port]
        del addresses[key.ip]
        self._counts[key.port][old] -= 1
        if not addresses:
            del self._addresses[key.port], self._counts[key.port]
        self._touch(key.port, key.ip)

    def _touch(self, port: int, ip: str) -> None:
        if port not in self._dirty:
            self._dirty[port] = {ip}
        elif (ips := self._dirty[port]) is not None:
            ips.add(ip)

    def _fallback(self, port: int) -> str | None:
        """The action for an address not listed under ``port``; None: the port has no entry."""
        nodeport = self._nodeports.get(port)
        if nodeport is not None:
            return f"{nodeport}-nodeport"
        counts = self._counts.get(port)
        if counts:  # the default: the chain most addresses take; on a tie "tcp" (any fixed order would do)
            return max(counts, key=lambda chain: (counts[chain], chain))
        return "tcp-nodeport" if port == _SENTINEL_PORT else None

    def _flush(self, port: int, ips: _Changed) -> None:
        fallback = self._fallback(port)
        if ips is None or fallback is None or fallback != self._fallbacks.get(port):
            self._build(port)
            return
        entry = self._ports[str(port)]
        addresses = self._addresses.get(port, {})
        listed = {ip: chain for ip in ips if (chain := addresses.get(ip)) is not None and chain != fallback}
        if not entry.HasField("matcher"):  # nothing was listed
            if listed:
                self._build(port)
            return
        entries = entry.matcher.matcher_tree.exact_match_map.map
        for ip in ips:
            if ip in listed:
                entries[ip].CopyFrom(_ACTIONS[listed[ip]])
            elif ip in entries:
                del entries[ip]
        if not entries:
            entry.CopyFrom(_ACTIONS[fallback])

    def _build(self, port: int) -> None:
        """``port``'s entry from scratch."""
        fallback = self._fallback(port)
        if fallback is None:
            self._fallbacks.pop(port, None)
            if str(port) in self._ports:
                del self._ports[str(port)]
            return
        self._fallbacks[port] = fallback
        entry = self._ports[str(port)]
        listed = [(ip, chain) for ip, chain in self._addresses.get(port, {}).items() if chain != fallback]
        if not listed:
            entry.CopyFrom(_ACTIONS[fallback])
            return
        entry.Clear()
        entry.matcher.on_no_match.CopyFrom(_ACTIONS[fallback])
        tree = entry.matcher.matcher_tree
        tree.input.CopyFrom(_DESTINATION_IP)
        entries = tree.exact_match_map.map
        for ip, chain in listed:
            entries[ip].CopyFrom(_ACTIONS[chain])


def route(options: l7.RouteOptions, cluster: str | None = None) -> route_components_pb2.Route:
    """One HTTP route: ``cluster`` None -> the cluster the connection's destination names (the default route)."""
    built = route_components_pb2.Route(name=cluster or "default")
    built.match.prefix = "/"  # required by the API; the virtual host's matcher has already chosen this route
    action = built.route
    if cluster is None:
        action.cluster_header = CLUSTER_HEADER
    else:
        action.cluster = cluster
    action.timeout.CopyFrom(_ms(options.timeout_ms))  # 0: none
    action.idle_timeout.CopyFrom(_ms(options.idle_timeout_ms))  # 0: none
    action.hash_policy.add().connection_properties.source_ip = True  # ring-hash (affinity) clusters only
    if options.retry_enabled or options.per_try_timeout_ms:
        retry = action.retry_policy
        retry.retry_on = options.retry_on
        retry.num_retries.value = options.num_retries if options.retry_enabled else 0
        if options.per_try_timeout_ms:
            retry.per_try_timeout.CopyFrom(_ms(options.per_try_timeout_ms))
        if options.retry_enabled:
            retry.retry_host_predicate.add(name="envoy.retry_host_predicates.previous_hosts",
                                           typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate()))
            retry.host_selection_retry_max_attempts = 3
    built.request_headers_to_remove.append(CLUSTER_HEADER)
    return built


def _route_action(name: str, options: l7.RouteOptions, cluster: str | None) -> matcher_pb2.Matcher.OnMatch:
    return matcher_pb2.Matcher.OnMatch(action=_typed(name, route(options, cluster)))


_CLUSTER_INPUT = _typed("cluster-header", http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=CLUSTER_HEADER))
_SENTINEL_CLUSTER = "none"  # no cluster is named so (names are ip:port or nodeport<family>:<port>)


class RouteBuilder:
    """The HTTP route configuration of one family, kept in step one key at a time like the listener matcher.

    The virtual host's matcher reads the ``x-lightpath-cluster`` header (set from the connection's original
    destination before routing, so exactly the key's cluster name, NodePorts included) and maps the keys
    whose Service customizes route options to their own route; every other request takes the default route
    with the default options. So the configuration stays as small as the number of customized keys."""

    def __init__(self, family: Family, default: l7.RouteOptions = l7.DEFAULT_ROUTE) -> None:
        self.config = route_pb2.RouteConfiguration(name=route_name(family))
        host = self.config.virtual_hosts.add(name="lightpath", domains=["*"])
        tree = host.matcher.matcher_tree
        tree.input.CopyFrom(_CLUSTER_INPUT)
        self._map = tree.exact_match_map.map
        self._map[_SENTINEL_CLUSTER].CopyFrom(_route_action("default", default, None))  # Envoy refuses an empty map
        host.matcher.on_no_match.CopyFrom(_route_action("default", default, None))
        self.routes: dict[str, l7.RouteOptions] = {}

    def set(self, cluster: str, options: l7.RouteOptions) -> bool:
        """True when the configuration changed."""
        if self.routes.get(cluster) == options:
            return False
        self.routes[cluster] = options
        self._map[cluster].CopyFrom(_route_action(cluster, options, cluster))
        return True

    def remove(self, cluster: str) -> bool:
        if self.routes.pop(cluster, None) is None:
            return False
        del self._map[cluster]
        return True


def route_configuration(family: Family) -> route_pb2.RouteConfiguration:
    """The HTTP routes with no customized key: every request takes the default route."""
    return RouteBuilder(family).config


def serialize(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)


# -- bootstrap -----------------------------------------------------------------------------------------

# Per Service port: traffic, errors and health, no per-cluster internals (those dominate Envoy's memory). Matched
# by suffix, not by one regex: Envoy tests every stat name of every cluster against the list, and at 10,000
# clusters a regex cost ~0.5 s of start-up (docs/performance.md, "Envoy's cost per cluster").
CLUSTER_STATS = ("upstream_cx_total", "upstream_cx_active", "upstream_cx_connect_fail", "upstream_cx_connect_timeout",
                 "upstream_cx_destroy_remote_with_active_rq", "upstream_rq_total", "upstream_rq_active", "upstream_rq_1xx",
                 "upstream_rq_2xx", "upstream_rq_3xx", "upstream_rq_4xx", "upstream_rq_5xx", "upstream_rq_timeout",
                 "upstream_rq_per_try_timeout",
                 "upstream_rq_retry", "upstream_rq_retry_success", "upstream_rq_pending_overflow", "membership_total",
                 "membership_healthy", "outlier_detection.ejections_active",
                 # request latency (a histogram): deferred like the counters, so only clusters with traffic
                 "upstream_rq_time")
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
            *({"suffix": "." + name} for name in CLUSTER_STATS), *({"prefix": p} for p in STAT_PREFIXES)]}}},
        # A cluster's traffic stats are created on its first connection: most of a node's 10,000 Services never
        # see one there (-35 % start-up time, -6 KiB per cluster; docs/performance.md).
        "deferred_stat_options": {"enable_deferred_creation_stats": True},
        # A safety net against running out of file descriptors, not a limit kube-proxy would have.
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                                      "DownstreamConnectionsConfig",
                             "max_active_downstream_connections": max_connections}}]},
    }
    # Give memory freed by configuration updates (old listener versions, replaced clusters) back to the OS.
    boot["memory_allocator_manager"] = {"bytes_to_release": 64 << 20, "memory_release_interval": "5s"}
    if mark is not None:
        boot["cluster_manager"] = {"upstream_bind_config": {"socket_options": [
            {"level": SOL_SOCKET, "name": SO_MARK, "int_value": mark, "state": "STATE_PREBIND"}]}}
    return boot

