"""The data plane's decisions, without I/O: routing, balancing, resilience, faults.

Nothing here imports an HTTP library. Adapters (`meshlib.clients`) turn a request into
`RequestAttributes`, ask for a plan, and carry it out.
"""
