"""Registration of the fused ops as `torch.library` custom ops in the namespace `incrementer_fast`."""
