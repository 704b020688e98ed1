"""The document library, no Ray: reading files into passages (``documents``, ``passages``), the
sentence embedder (``embedding``), the index on disk (``index``: its layout, manifest and
publishing) and search over it (``search``). ``library_job`` builds and evaluates indexes with Ray."""
