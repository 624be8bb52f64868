"""What runs in the pod VM: process-user-data, the agent-protocol forwarder, VM-side network."""
