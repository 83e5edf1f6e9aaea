"""Process placement and the distributed runtime: the only package that may import
torch.distributed or DeepSpeed."""
