"""The agent's node-level HTTP endpoints: the always-on health server (``/healthz``, ``/readyz``, ``/metrics``,
what the kubelet probes) and the optional read-only debug server (``/debug/*`` plus the same three).

Pure answers (``views``, ``lookup``, ``pages``, ``text``), the shells that read (``source``, ``netlink``), the
FastAPI apps (``app``), the uvicorn thread (``server``), their settings (``settings``), the wiring the agent
calls (``launch``) and the client (``cli``). Empty on purpose: ``redirector.config`` imports ``settings``
without pulling in FastAPI.
"""
