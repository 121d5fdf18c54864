"""semiscale data: datasets on disk, torchvision transforms, DALI pipelines and batch loaders."""
