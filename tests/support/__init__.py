"""Helpers shared by several test packages (no tests here): polling with a deadline, a kubelet-style Secret volume."""
