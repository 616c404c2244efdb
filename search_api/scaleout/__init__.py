"""The search tier on a Ray cluster (``blip2-search serve --engine ray --shards N``): the vector index
partitioned by image id over shard actors (``shards``), the models in replica actors (``models``), and
the FastAPI app of ``search_api.app`` in front as the ingress, unchanged (``watcher`` plugs the shards
in where the single-process server keeps its ``LiveIndex``). docs/scale-out.md."""
