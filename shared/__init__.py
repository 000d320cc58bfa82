"""What the webhook, the redirector and the CLI must agree on: constants and the Service policy."""

from shared.policy import Action, Decision, PolicyConfig, PortInfo, decide

__all__ = ["Action", "Decision", "PolicyConfig", "PortInfo", "decide"]
