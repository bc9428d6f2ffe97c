"""Plug gradscope into the places people train.

Each integration is its own module, imported only when used (its framework is optional):

- `gradscope.integrations.lightning.GradscopeCallback`: a PyTorch Lightning callback;
- `gradscope.integrations.transformers.GradscopeCallback`: a Hugging Face `TrainerCallback`;
- `gradscope.integrations.tensorboard.TensorBoardExporter` and `export()`: TensorBoard scalars
  and diagnosis text.

torch.distributed (DDP, FSDP2) and torch.compile need nothing extra: `gradscope.watch` handles
them (see docs/integrations.md).

Example:
    >>> from gradscope.integrations.tensorboard import TensorBoardExporter
    >>> TensorBoardExporter.__name__
    'TensorBoardExporter'
"""
