"""DreamBooth training of MoSLoRA adapters: the recipe (:mod:`.dreambooth`) and its pieces.

    args         flags (named as diffusers'), --config merging, input checks before anything is written
    base_model   the base pipeline: a folder, a hub id, or tiny:<family>
    data         image discovery and reading, PIL transforms, the dataset, its sampler, latent caching
    prior        class-image generation for prior preservation
    objectives   noise prediction (epsilon / v, min-SNR, noise offset) and flow matching
    loop         precision, adapters, optimizer, prompt conditioning, the loss of one batch
    checkpoints  accelerate save_state / load_state, pruning, exact resume
    guards       one run per --output_dir (a lock), Ctrl-C saves first, a non-finite loss stops the run
    validation   validation images, grids, TensorBoard
    model_card   the README.md written next to the adapter
"""
