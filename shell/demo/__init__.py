"""``scaiwave demo``: the admin guide run end to end between two real daemons on loopback
(:mod:`.guide`), on a throwaway CA and real ``scaiwave serve`` processes (:mod:`.testbed`).
It needs the ``demo`` extra (trustme)."""
