"""Storage: one interface (:class:`.store.Store`, its queries written once, with the admin
and outbox rows in :mod:`.admin_rows` and :mod:`.outbox_rows`) on two backends, SQLite
(:mod:`.sqlite_store`, the default) and PostgreSQL (:mod:`.postgres_store`), whose SQL
differs in one place (:mod:`.dialect`); one list of migrations (:mod:`.schema`); the Trio
wrapper that runs it on one worker thread at a time (:mod:`.async_store`); online backups of
SQLite (:mod:`.backup`) and the move of a stopped server's data to PostgreSQL (:mod:`.move`)."""
