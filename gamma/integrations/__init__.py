"""Adapters to data engines (Ray Data: :mod:`gamma.integrations.ray`); each needs its optional extra."""
