"""The document library, no Ray: listing a folder (``folder``), reading files into passages under
limits (``documents``, ``sandbox``, ``passages``), the sentence embedder (``embedding``), the index on
disk (``index``: its layout, manifest and publishing) and search over it (``search``).
``library_job`` builds and evaluates libraries with Ray."""
