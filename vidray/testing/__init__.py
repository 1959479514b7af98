"""Test-only machinery (fault injection). Production code never imports it: a run loads it only
when a test asks for it through the environment (vidray.testing.faults)."""
