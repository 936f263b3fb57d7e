"""Everything that differs between one process, DDP, FSDP2 and DeepSpeed ZeRO-1/2, and the collectives that keep
processes in step (sharing a failure, a flag or a main-process-first turn)."""
