"""How reads pick and fetch: seeded samples of a view (sample.py) and byte-range gathers from
object storage (ranges.py); store.materialize uses both."""
