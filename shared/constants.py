"""Every name, label and port the components share, in one place."""

from typing import Final

# The label kube-proxy honours: a Service carrying it is left to the named proxy.
SERVICE_PROXY_NAME_LABEL: Final = "service.kubernetes.io/service-proxy-name"
# Our value for it (the value the original Lightpath Envoy data plane expects).
DEFAULT_PROXY_NAME: Final = "lightpath.cloud"

# Opt-in/opt-out label, on a Service or on its Namespace.
OPT_LABEL: Final = "lightpath.cloud/proxy"
OPT_ENABLED: Final = "enabled"
OPT_DISABLED: Final = "disabled"

# Annotation the webhook keeps on a Service with the current decision's reason.
REASON_ANNOTATION: Final = "lightpath.cloud/reason"

# Global modes.
MODE_OPT_IN: Final = "opt-in"
MODE_OPT_OUT: Final = "opt-out"
MODES: Final = (MODE_OPT_IN, MODE_OPT_OUT)
DEFAULT_MODE: Final = MODE_OPT_IN

# Our own namespace, and the namespaces the policy never touches by default.
DEFAULT_NAMESPACE: Final = "lightpath-system"
DEFAULT_EXCLUDED_NAMESPACES: Final = ("kube-system", "cert-manager", DEFAULT_NAMESPACE)

# Ports. The redirector's health and debug ports collide with none of kube-proxy (10249, 10256), Envoy
# admin (15000), the proxy (1666) or xDS (18000). Health (/healthz, /readyz, /metrics: what the kubelet
# probes) is always on; debug (/debug/*) may be turned off, as kube-proxy keeps 10256 apart from 10249.
DEFAULT_PROXY_PORT: Final = 1666
# The proxy's transparent listener (--preserve-source-ip): externalTrafficPolicy Local traffic whose backend
# sees the client's address. Its replies are routed back to the proxy by TRANSPARENT_REPLY_MARK through this
# routing table, looked up by a rule of this priority: after `local` (0), before the rules CNIs
# add for their pods' sources (the AWS VPC CNI's start at 512).
DEFAULT_TRANSPARENT_PORT: Final = 1667
# The mark the kernel puts on the REPLIES of the proxy's transparent connections (recognised by the proxy
# mark in their conntrack entry): the routing rule delivers packets with it locally. Not the proxy mark
# itself, which the proxy's own outgoing packets carry: those must be routed out as usual.
TRANSPARENT_REPLY_MARK: Final = 0x1667
TRANSPARENT_ROUTE_TABLE: Final = 1666
TRANSPARENT_RULE_PRIORITY: Final = 100
WEBHOOK_PORT: Final = 8443
REDIRECTOR_DEBUG_PORT: Final = 10666
REDIRECTOR_DEBUG_ADDRESS: Final = "127.0.0.1"
REDIRECTOR_HEALTH_PORT: Final = 10667
REDIRECTOR_HEALTH_ADDRESS: Final = "127.0.0.1"
ENVOY_ADMIN_PORT: Final = 15000
XDS_PORT: Final = 18000
RESERVED_PORTS: Final = frozenset({10249, 10256, 15000, 1666, 1667, 18000})

# Default names of the kernel objects the redirector owns.
DEFAULT_NFT_TABLE: Final = "lightpath"
DEFAULT_IPTABLES_CHAIN: Final = "LIGHTPATH"
# Packets with this mark (set by the proxy) are never redirected.
DEFAULT_PROXY_MARK: Final = 0x1666

# How the kernel sends a Service's traffic to the proxy. "dnat" (default): to a node-local address of ours
# on lo, which works whatever address the incoming interface has; "redirect": REDIRECT to the incoming
# interface's primary address, which drops pod traffic where the CNI leaves the host veth without one
# (Calico, Cilium chaining, AWS VPC CNI). See docs/redirector.md, "Redirect primitive".
REDIRECT_MODES: Final = ("dnat", "redirect")
DEFAULT_REDIRECT_MODE: Final = "dnat"
# The DNAT targets the agent keeps on lo: link-local IPv4 (as NodeLocal DNSCache's 169.254.20.10) and a
# ULA. Never 127.0.0.1: forwarded packets reach it only with route_localnet=1 (CVE-2020-8558).
DEFAULT_REDIRECT_ADDRESS: Final = "169.254.16.66"
DEFAULT_REDIRECT_ADDRESS6: Final = "fd6c:7066:1666::1"

# appProtocol values the proxy speaks HTTP for (the one list: the control plane's chains, `lightpath status`'s
# "(http)"): HTTP/1.1 (websockets over it included) and cleartext HTTP/2. Anything else -- TLS included
# (https, h2, wss: the proxy cannot read those) -- is proxied as plain TCP.
HTTP1_APP_PROTOCOLS: Final = frozenset({"http", "ws", "kubernetes.io/ws", "https-terminated-elsewhere", "grpc-web"})
H2C_APP_PROTOCOLS: Final = frozenset({"h2c", "kubernetes.io/h2c", "grpc", "http2"})
HTTP_APP_PROTOCOLS: Final = HTTP1_APP_PROTOCOLS | H2C_APP_PROTOCOLS

# The control plane's xDS socket, in a hostPath directory shared by the agent and Envoy pods.
DEFAULT_XDS_SOCKET: Final = "/run/lightpath/xds.sock"

# Make-before-break migration (docs/migration.md, "Handover protocol"): a Service marked with this annotation
# (value "migrate") is prepared by every node agent -- Envoy ACKed, redirect installed, shadowing
# kube-proxy's rules -- before its handoff label is set. Each agent reports the marked Services it has
# prepared in its Lease (namespace of the agents, name prefix below), in the PREPARED annotation.
HANDOVER_ANNOTATION: Final = "lightpath.cloud/handover"
HANDOVER_MIGRATE: Final = "migrate"
AGENT_LEASE_PREFIX: Final = "lightpath-agent-"
PREPARED_ANNOTATION: Final = "lightpath.cloud/prepared"
# How many redirects the agent holds in the kernel (handed-back Services keep theirs until kube-proxy's rule
# is visible): `lightpath uninstall` waits until every live agent says "0".
REDIRECTS_ANNOTATION: Final = "lightpath.cloud/redirects"
# On the same Lease: this node's Envoy traffic per migrated Service over the last renewal period, bounded
# (the busiest first): {"window": s, "services": {"ns/name": [req/s, 5xx/s, retries/s, p99 ms or null]}}.
# `lightpath status` adds the nodes up.
TRAFFIC_ANNOTATION: Final = "lightpath.cloud/traffic"
DEFAULT_AGENT_NAMESPACE: Final = "lightpath-node"
AGENT_LEASE_SECONDS: Final = 15

# Kubernetes Events (core/v1, on the Service: `kubectl describe service` lists them) that tell the operator
# how a handover went (docs/migration.md, "Events"). Reasons are CamelCase, as Kubernetes' own.
EVENT_HANDOVER_STARTED: Final = "HandoverStarted"
EVENT_HANDOVER_PREPARED: Final = "HandoverPrepared"
EVENT_HANDOVER_ABORTED: Final = "HandoverAborted"
EVENT_HANDOVER_IGNORED: Final = "HandoverIgnored"  # a handover annotation agents ignore (the controller)
EVENT_MIGRATED: Final = "Migrated"
EVENT_ROLLED_BACK: Final = "RolledBack"
EVENT_NORMAL: Final = "Normal"
EVENT_WARNING: Final = "Warning"
# The source component / reportingComponent of the Events the CLI writes.
CLI_COMPONENT: Final = "lightpath-cli"
# Kubernetes caps an Event's message (events.k8s.io note) at 1 KiB: ours never exceed it.
EVENT_MESSAGE_MAX_BYTES: Final = 1024
