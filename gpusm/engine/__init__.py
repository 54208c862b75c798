"""The use cases: the coordinator and the lifecycle, monitor and recovery it runs.

Everything here talks to the outside world through :mod:`gpusm.ports` only; it names
no runtime and no GPU backend. :mod:`gpusm.wiring` hands it concrete adapters.
"""
