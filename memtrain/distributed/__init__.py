"""Training beyond one process: model parallel over RPC, pipeline parallel and data parallel.

Every process is started by ``torchrun``; its role comes from ``RANK`` (with c10d
rendezvous the order of nodes is not fixed, so nothing depends on which host a rank
lands on). Rank 0 writes the run directory in every strategy.

=============  ======================================================================
``rpc``        :mod:`memtrain.distributed.rpc` — master + encoder + decoder workers
``pipeline``   :mod:`memtrain.distributed.pipeline` — two stages, microbatches
``ddp``        :mod:`memtrain.distributed.ddp` — data parallel replicas (Lightning)
=============  ======================================================================

Every placement trains with the one loop of :mod:`memtrain.loop` (Lightning's, over
:class:`memtrain.loop.module.EnhancementModule`): ddp through Lightning's DDP strategy, rpc
and pipeline through :mod:`.sharded` (rank 0 runs the single-process run with the shards
behind its placement hooks; the other ranks serve). Shared pieces: :mod:`.launch`
(environment, process groups, devices), :mod:`.heartbeat` (ranks exit when rank 0 dies),
:mod:`.split` (the U-Net cut), :mod:`.shard` (one shard's model, optimizer and thread
contexts), :mod:`.memory` (per-rank phase peaks and their summary), :mod:`.estimate` (every
rank's step memory estimated in one process, with fake tensors: per-shard figures at sizes no
test machine trains).
"""
