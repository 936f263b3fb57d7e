"""IP-Adapter image prompts (Ye et al. 2023, arXiv:2308.06721): a CLIP image encoder's embedding of an image, projected
to a few extra tokens that a second, "decoupled" cross-attention in every U-Net cross-attention layer attends to,
its output added to the text's times a scale.

    unit.py           `IPAdapterUnit`: an adapter, its image and scale, as the request holds them (and the PNG text)
    format.py         the adapter file (tencent-ailab's `ip_adapter.safetensors` layout), read and checked
    image_encoder.py  the CLIP vision model it needs: found, checked against the adapter, loaded; image -> embeds
    adapters.py       adapters on a U-Net (diffusers' own attention processors); a request's images -> conditioning
    options.py        the command line's --ip-* options -> units

Opening (spec before any weight is read, then loading) is `ldm.models.ip_adapter`, called by `Pipeline.open`.
"""
