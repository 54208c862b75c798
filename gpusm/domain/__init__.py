"""The pure core: service states, the transition table, events and the eviction policy.

Nothing here does I/O, reads a clock or touches a database; a test enforces it.
"""
