"""autograd Functions binding each forward op to its closed-form backward op."""
