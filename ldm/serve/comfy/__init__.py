"""ComfyUI's HTTP and websocket API on `ldm-serve` (docs/serve.md, "ComfyUI clients"): graphs checked whole
(`graph`), mapped onto the one `GenerationRequest` (`plan`), run by the same worker as the A1111 API (`routes`)."""
