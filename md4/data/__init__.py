

IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10")  # config.data.dataset values of images
