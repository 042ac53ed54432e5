"""The customer-side SDK: AgentRunner dials out and serves sessions as text."""
