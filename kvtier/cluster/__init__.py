"""Cluster: which instance holds which chunks (controller, KV events, routing lookup).

- events.py:  tiers' admit/evict notifications collected into numbered batches (instance side)
- index.py:   the controller's chunk -> instances index and its prefix lookup
- state.py:   the controller's instances: registration, heartbeats, sequence numbers, resync
- app.py:     the controller's HTTP API;  controller.py: `kvtier controller`
- agent.py:   the instance side: registers, heartbeats and ships events to the controller
"""
