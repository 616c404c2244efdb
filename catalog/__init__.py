"""The shared storage layer: the SQL catalog (system of record) and the multi-vector index derived from it.

Modules (import the one you need; this package imports nothing heavy on its own):

- ``catalog.models``: SQLAlchemy models (library roots, images, files, embeddings, captions, index state).
- ``catalog.db``: ``make_engine``, ``session_factory``, ``upgrade`` (Alembic to head), ``check``.
- ``catalog.repository``: the typed functions the indexer and the search API call instead of SQL.
- ``catalog.vector_index``: ``MultiVectorIndex``, exact (flat) or approximate (IVF) max-sim search.
- ``catalog.index_store``: ``open_vector_index``, ``catch_up``, ``LiveIndex``: the index file kept in step
  with the catalog's published generation.

See docs/catalog.md.
"""
