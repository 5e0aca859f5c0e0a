

IMAGE_DATASETS = ("mnist", "mnist5k", "fashion_mnist", "cifar10")  # config.data.dataset values
