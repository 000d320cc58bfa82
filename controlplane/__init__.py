"""The node-local Envoy control plane: Services + EndpointSlices -> Envoy resources over Delta ADS."""
