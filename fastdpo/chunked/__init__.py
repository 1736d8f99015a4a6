"""The ``torch`` backend: chunked pure-PyTorch kernels with bounded temporaries (runs anywhere)."""
