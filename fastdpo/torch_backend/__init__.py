"""The ``torch`` backend: pure-PyTorch row kernels over chunks of rows, with bounded temporaries
(CPU and CUDA tensors; the only backend taking fp64), and the fused-LM-head chunk loops."""
