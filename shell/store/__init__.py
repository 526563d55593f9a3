"""Storage: the SQLite store (:mod:`.store`, with the admin and outbox rows in
:mod:`.admin_rows` and :mod:`.outbox_rows`), its migrations (:mod:`.schema`), the Trio
wrapper that runs it on one writer thread (:mod:`.async_store`) and online backups
(:mod:`.backup`)."""
