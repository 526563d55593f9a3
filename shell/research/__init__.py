"""Research on recordings: ``scaiwave replay``'s export and filters (:mod:`.export`), diff
(:mod:`.diff`), statistics (:mod:`.stats`), the timeline picture (:mod:`.plot`) and the
command glue (:mod:`.command`). docs/replay.md describes them."""
