"""Optional integrations with other training frameworks.

Each submodule imports its framework on import and is never imported by ``import kdfast``:
:mod:`kdfast.integrations.torchdistill` registers kdfast losses in torchdistill's registry.
"""
