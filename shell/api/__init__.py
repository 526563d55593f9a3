"""The handlers, one module per audience: :mod:`.client` (local users), :mod:`.admin`,
:mod:`.federation` (peers), :mod:`.ops` (health, metrics) and :mod:`.public` (the
descriptor). Each gathers facts from storage, asks the core, and carries out its answer."""
