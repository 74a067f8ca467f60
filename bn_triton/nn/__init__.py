"""Layers with torch's semantics, above the functional API and the ops: BatchNorm* and
BatchNormAct* (modules), Batch Renormalization (renorm), ghost batch norm (ghost),
SyncBatchNorm* (sync), and the model rewrites convert_batchnorm and
fuse_batchnorm_activations (convert). Imports go one way: convert -> renorm, ghost -> sync ->
modules -> bn_triton.functional."""
