"""Expert FFN kernels over ragged, expert-sorted rows: the ``segment`` kernel and the native one."""
