"""What an operator sees: per-request observation (:mod:`.requests`), Prometheus metrics
(:mod:`.metrics`), health and readiness (:mod:`.health`), structured logs (:mod:`.logs`)
and ``scaiwave self-test`` (:mod:`.selfcheck`)."""
