"""3D U-Net lung-nodule segmentation: NIfTI/LUNA16 data, preprocessing, patches, model, loss, metric, inference."""
