"""The running daemon: :mod:`.daemon` starts it, :mod:`.service` holds the node, store and
peers, :mod:`.outbox` carries out the core's delivery machine, :mod:`.backfill_jobs` runs
admin backfills, :mod:`.verify_pool` checks signatures on threads, :mod:`.timings`
measures, :mod:`.ops` answers the operations API."""
