"""semiscale data: datasets on disk, the rank-sharded sampler, each loader kind's views, torchvision
transforms, DALI pipelines and the batch loaders over them."""
