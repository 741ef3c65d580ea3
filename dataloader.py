"""
The training data: prepare.py's shards cut into (block_size + 1)-token windows, dealt to the processes in seeded
epochs of micro-batches, with the position in the epoch saved in checkpoints so a resumed run sees exactly the batches
it would have. train.py reads its batches here, bench.py its real-data ones.

    from dataloader import load_data, make_batches
    data_dir, meta, tok = load_data("data", "stdlib")
    train_windows, batches, eval_loaders = make_batches(data_dir, meta, cfg, rank=0, world=1, data_state={}, pin=False)
    x, y = next(batches)  # (batch_size, block_size) inputs and their targets, shifted by one
"""
import os

import numpy as np
import torch

import bpe
from prepare import load_meta, read_header, read_shard


class TokenWindows:
    """The (block_size + 1)-token windows of the shards on a grid of stride block_size, started `shift` tokens
    into each shard: window i gives the inputs x = tokens[s : s+T] and the targets y = tokens[s+1 : s+T+1].
    Windows never cross shards. Training moves the grid every epoch (Batches), evaluation keeps shift 0."""

    def __init__(self, paths, block_size):
        self.shards = [read_shard(p) for p in paths]
        self.block_size = block_size
        if len(self) == 0:
            raise SystemExit(f"error: block_size {block_size} is longer than the data in {paths[0]}'s split "
                             f"({max(len(s) for s in self.shards)} tokens); lower block_size or add data")

    def starts(self, shift=0):
        """Cumulative window counts per shard under this shift: window index -> shard, by binary search."""
        return np.cumsum([0] + [max((len(s) - 1 - shift) // self.block_size, 0) for s in self.shards])

    def __len__(self):
        return int(self.starts()[-1])

    def window(self, i, starts, shift=0):
        shard = int(np.searchsorted(starts, i, side="right")) - 1
        s = shift + (i - starts[shard]) * self.block_size
        w = torch.from_numpy(self.shards[shard][s:s + self.block_size + 1].astype(np.int64))
        return w[:-1], w[1:]


class Batches:
    """Epochs over a TokenWindows: each epoch is a seeded permutation of every window, dealt round-robin
    to the ranks (no overlap between ranks, no replacement), cut into micro-batches. With shift=True each epoch
    also moves the window grid by a seeded offset in [0, block_size): on data seen for many epochs, a fixed grid
    lets the model memorise the same windows every epoch (train loss falls while val loss turns up sooner).
    The position (epoch, batch, shift) is saved in checkpoints, so a resumed run sees exactly the batches it
    would have."""

    def __init__(self, ds, batch_size, rank, world, seed, *, epoch=0, pos=0, offset=None, shift=False, pin=False):
        self.ds, self.batch_size, self.rank, self.world, self.seed = ds, batch_size, rank, world, seed
        self.epoch, self.pos, self.shift, self.pin = epoch, pos, shift, pin
        self._order(offset)
        if self.per_epoch == 0:
            raise SystemExit(f"error: {len(ds)} windows of block_size {ds.block_size} are too few for "
                             f"batch_size {batch_size} x {world} processes; lower batch_size or block_size")

    def _order(self, offset=None):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        # the grid offset of this epoch (drawn, or restored from a checkpoint); epoch 0 keeps the unshifted grid
        drawn = int(torch.randint(self.ds.block_size, (1,), generator=g)) if self.shift and self.epoch else 0
        self.offset = drawn if offset is None else offset
        self.starts = self.ds.starts(self.offset)
        n = int(self.starts[-1])
        self.per_epoch = (n // self.world) // self.batch_size
        self.order = torch.randperm(n, generator=g)[self.rank::self.world]

    def __next__(self):
        if self.pos >= self.per_epoch:  # (>: a run resumed on more processes has shorter epochs)
            self.epoch, self.pos = self.epoch + 1, 0
            self._order()
        idx = self.order[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        x, y = (torch.stack(t) for t in zip(*(self.ds.window(int(i), self.starts, self.offset) for i in idx)))
        if self.pin:  # page-locked memory lets the copy to the GPU run asynchronously
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def state(self):
        return dict(epoch=self.epoch, pos=self.pos, offset=self.offset)


def split_paths(data_dir, meta, split):
    paths = [os.path.join(data_dir, p) for p in meta[f"{split}_shards"]]
    for p in paths:
        if not os.path.isfile(p):
            raise SystemExit(f"error: shard {p} is missing; re-run prepare.py")
        if read_header(p)["tokenizer_hash"] != meta["tokenizer_hash"]:
            raise SystemExit(f"error: {p} was made with another tokenizer than {data_dir}/meta.json says; "
                             f"re-run prepare.py")
    return paths


def load_data(data_root, dataset):
    """(data_dir, meta, tokenizer) of a dataset made by prepare.py, its tokenizer file checked against the shards'."""
    data_dir = os.path.join(data_root, dataset)
    meta = load_meta(data_dir)
    tok_path = os.path.join(data_dir, meta["tokenizer"])
    tok = bpe.Tokenizer.load(tok_path)
    if tok.hash != meta["tokenizer_hash"]:
        raise SystemExit(f"error: {tok_path} is not the tokenizer {data_dir}/meta.json and the shards were made "
                         f"with; re-run prepare.py")
    return data_dir, meta, tok


def make_batches(data_dir, meta, cfg, *, rank, world, data_state, pin):
    """(the train windows, the training batches from data_state on, {split: a function making eval batches}) of
    the config cfg (its block_size, batch_size, seed, eval_train)."""
    block_size, batch_size, seed = cfg.block_size, cfg.batch_size, cfg.seed
    train_ds = TokenWindows(split_paths(data_dir, meta, "train"), block_size)
    val_ds = TokenWindows(split_paths(data_dir, meta, "val"), block_size)
    batches = Batches(train_ds, batch_size, rank, world, seed, shift=True, pin=pin, **data_state)
    # evaluation always uses the same windows (epoch 0 of a fixed permutation), so numbers are comparable
    loaders = {"train": lambda: Batches(train_ds, batch_size, rank, world, seed + 1, pin=pin),
               "val": lambda: Batches(val_ds, batch_size, rank, world, seed + 1, pin=pin)}
    if not cfg.eval_train:
        del loaders["train"]
    try:  # made once now: too few val windows is an error before step 1, not at the first evaluation
        loaders["val"]()
    except SystemExit as e:
        raise SystemExit(f"{e} (the val split: {len(val_ds)} windows)") from None
    return train_ds, batches, loaders
