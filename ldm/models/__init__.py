"""Models as the package opens them: what a model is (`spec.inspect_model`, from headers and configs only), its
loaded parts (`components.Components`) and how they are loaded (`load.load_components`, `load.load_unet`).
`ldm.pipeline.Pipeline.open` builds a pipeline on top; training's `model.pretrained` loads its U-Net here too."""
