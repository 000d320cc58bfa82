"""Node helpers for tests and the demo: network namespaces, traffic, echo servers, client loops, nft monitor, Envoy runner."""
