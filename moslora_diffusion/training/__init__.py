"""DreamBooth training of MoSLoRA adapters: the recipe (:mod:`.dreambooth`) and its pieces.

entry        the command line: parse and check (light imports), then run the recipe
config       RunConfig: every flag as a frozen dataclass field (help, group, check); the parser and --config merging
run_inputs   checks against the file system; RunInputs: the resolved base, image list and resume checkpoint
base_model   the base pipeline: a folder, a hub id, or tiny:<family>
data         image discovery and reading, PIL transforms, the dataset, its sampler, latent caching
prior        class-image generation for prior preservation
objectives   noise prediction (epsilon / v, min-SNR, noise offset) and flow matching
adapters     precision and placement of the frozen base, the MoSLoRA adapters, their optimizer
batches      prompt conditioning, latents, the loss of one batch
checkpoints  accelerate save_state / load_state, pruning, exact resume
guards       one run per --output_dir (a lock; no silent overwrite), Ctrl-C saves first, a non-finite loss stops
train_log    logs/train_log.jsonl: step, loss, lr, seconds (no TensorBoard needed)
validation   validation images, grids, TensorBoard
model_card   the README.md written next to the adapter
"""
