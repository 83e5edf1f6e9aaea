"""Pure diffusion math and model builders: no torch.distributed, DeepSpeed, Ray or boto3."""
