"""Fuzz harnesses for every decoder of untrusted bytes in the core.

The invariant, as in h11's fuzz harness: any bytes either decode or come back
as the core's typed refusal (:class:`~scaiwave_federation.core.Refused`, or a
documented effect such as :class:`~scaiwave_federation.core.NeedKeys`), never
another exception, and never slower than a small per-input budget.

- :mod:`fuzz.harnesses` -- one harness per decoder, and the budget check;
- :mod:`fuzz.world` -- the fixed servers, keys and valid seed inputs, built
  with the core itself;
- :mod:`fuzz.gen` -- structure-aware CBOR/JSON generation and mutation;
- :mod:`fuzz.run` -- the command: ``python -m fuzz.run --seconds N``.
"""
