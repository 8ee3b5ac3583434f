"""backer's benchmarks: ``python -m benchmarks`` compares backer with Syncthing, rsync and
Unison on the same seeded data in one run (see ``docs/benchmarks.md``)."""
