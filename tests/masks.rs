//! Masks: loading, checks, the recorded centre crop shared with the photo, latent-size area average.

use candle_core::{DType, Device};
use image::imageops::FilterType;
use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use layerdiff::image_io::resize_center_crop;
use layerdiff::method::masks::{
    apply_crop, area_fraction, fit_size, load_mask, mask_to_latent, resize_center_crop_recorded, validate_mask, Crop,
    MASK_FILTER,
};

fn latent_values(mask: &GrayImage, factor: usize) -> (Vec<usize>, Vec<f32>) {
    let t = mask_to_latent(mask, factor, &Device::Cpu, DType::F32).unwrap();
    (t.dims().to_vec(), t.flatten_all().unwrap().to_vec1().unwrap())
}

#[test]
fn latent_mask_is_the_area_average_of_each_block() {
    // 24x8, factor 8: three cells. White on x in 4..12 cuts cells 0 and 1 in half; cell 2 is gray 51.
    let mask = GrayImage::from_fn(24, 8, |x, _| {
        if (4..12).contains(&x) {
            Luma([255])
        } else if x >= 16 {
            Luma([51])
        } else {
            Luma([0])
        }
    });
    let (dims, v) = latent_values(&mask, 8);
    assert_eq!(dims, vec![1, 1, 1, 3]);
    assert_eq!(v[0], 0.5);
    assert_eq!(v[1], 0.5);
    assert!((v[2] - 0.2).abs() < 1e-6, "{}", v[2]);

    // Rows too: a 16x16 mask white in its top-left 12x4 -> [[ (8*4)/64, (4*4)/64 ], [0, 0]].
    let mask = GrayImage::from_fn(16, 16, |x, y| Luma([if x < 12 && y < 4 { 255 } else { 0 }]));
    let (dims, v) = latent_values(&mask, 8);
    assert_eq!(dims, vec![1, 1, 2, 2]);
    assert_eq!(v, vec![0.5, 0.25, 0.0, 0.0]);
}

#[test]
fn latent_mask_needs_a_multiple_of_the_factor() {
    let err = mask_to_latent(&GrayImage::new(20, 16), 8, &Device::Cpu, DType::F32).unwrap_err().to_string();
    assert!(err.contains("20x16") && !err.contains('\n'), "{err}");
}

#[test]
fn area_fraction_is_the_mean() {
    let mask = GrayImage::from_fn(10, 10, |x, _| Luma([if x < 3 { 255 } else { 0 }]));
    assert!((area_fraction(&mask) - 0.3).abs() < 1e-12);
    assert!(area_fraction(&mask) > 0.1 && area_fraction(&GrayImage::from_pixel(10, 10, Luma([20]))) < 0.1);
}

#[test]
fn mask_of_another_aspect_ratio_is_refused_naming_the_mask() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("subject-mask.png");
    GrayImage::new(300, 200).save(&path).unwrap();
    let err = load_mask(&path, (512, 512)).unwrap_err().to_string();
    assert!(err.contains("subject-mask.png"), "{err}");
    assert!(err.contains("aspect ratio 300:200 differs from the image's 512:512"), "{err}");
    assert!(err.contains("give a mask made for this image") && !err.contains('\n'), "{err}");

    // under 1 % off (a mask saved at another resolution) is fine, and comes back at the image's size
    GrayImage::new(1000, 501).save(&path).unwrap();
    assert_eq!(load_mask(&path, (1000, 500)).unwrap().dimensions(), (1000, 500));
}

#[test]
fn mask_is_gray_soft_and_at_the_original_size() {
    let dir = tempfile::tempdir().unwrap();
    // RGB mask, half the image's size: white left half, soft gray right half
    let path = dir.path().join("m.png");
    RgbImage::from_fn(40, 30, |x, _| if x < 20 { Rgb([255; 3]) } else { Rgb([128; 3]) }).save(&path).unwrap();
    let mask = load_mask(&path, (80, 60)).unwrap();
    assert_eq!(mask.dimensions(), (80, 60));
    assert_eq!(mask.get_pixel(5, 30).0[0], 255);
    assert_eq!(mask.get_pixel(75, 30).0[0], 128, "soft values are kept, not thresholded");

    // a cut-out (transparent background) is read through its alpha channel
    let path = dir.path().join("cutout.png");
    RgbaImage::from_fn(8, 8, |x, _| if x < 4 { Rgba([30, 60, 90, 255]) } else { Rgba([200, 200, 200, 0]) }).save(&path).unwrap();
    let mask = load_mask(&path, (8, 8)).unwrap();
    assert_eq!((mask.get_pixel(1, 1).0[0], mask.get_pixel(6, 1).0[0]), (255, 0));

    let missing = load_mask(&dir.path().join("nope.png"), (8, 8)).unwrap_err().to_string();
    assert!(missing.contains("nope.png") && !missing.contains('\n'), "{missing}");
}

#[test]
fn empty_and_full_masks_are_refused() {
    let err = validate_mask(&GrayImage::from_pixel(8, 8, Luma([127])), "--mask").unwrap_err().to_string();
    assert_eq!(err, "--mask: mask is empty; paint the subject white");
    let err = validate_mask(&GrayImage::from_pixel(8, 8, Luma([128])), "--mask").unwrap_err().to_string();
    assert!(err.starts_with("--mask: mask covers the whole image; "), "{err}");
    let mut ok = GrayImage::new(8, 8);
    ok.put_pixel(3, 3, Luma([255]));
    validate_mask(&ok, "--mask").unwrap();
}

#[test]
fn fit_size_is_a_square_multiple_of_the_factor() {
    assert_eq!(fit_size((1000, 700), 512, 8), (512, 512));
    assert_eq!(fit_size((300, 900), 500, 8), (496, 496));
    assert_eq!(fit_size((64, 64), 3, 8), (8, 8));
}

#[test]
fn crop_keeps_the_centre_and_is_recorded() {
    let crop = Crop::center((40, 20), 10, 10);
    assert_eq!(crop, Crop { scale: 0.5, x: 5, y: 0, width: 10, height: 10 });
    assert_eq!(Crop::center((30, 90), 30, 30), Crop { scale: 1.0, x: 0, y: 30, width: 30, height: 30 });
    assert_eq!(Crop::center((64, 64), 64, 64), Crop { scale: 1.0, x: 0, y: 0, width: 64, height: 64 });

    // the middle 20x20 of a 40x20 gray image is white: the 10x10 crop is all white
    let img = GrayImage::from_fn(40, 20, |x, _| Luma([if (10..30).contains(&x) { 255 } else { 0 }]));
    let (out, rec) = resize_center_crop_recorded(&img, 10, 10, MASK_FILTER);
    assert_eq!((out.dimensions(), rec), ((10, 10), crop));
    assert!(out.pixels().all(|p| p.0[0] > 200), "crop was not centred");

    // the record survives a session file
    let json = serde_json::to_string(&rec).unwrap();
    assert_eq!(serde_json::from_str::<Crop>(&json).unwrap(), rec);
}

/// A mask drawn on the photo's subject stays on it after both are fitted to the model's size.
#[test]
fn mask_and_image_get_the_same_crop() {
    // 120x80 photo, a red 20x20 subject off centre (x 70..90, y 30..50), its mask at the same place
    let subject = |x: u32, y: u32| (70..90).contains(&x) && (30..50).contains(&y);
    let photo = RgbImage::from_fn(120, 80, |x, y| if subject(x, y) { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) });
    let mask = GrayImage::from_fn(120, 80, |x, y| Luma([if subject(x, y) { 255 } else { 0 }]));

    let (w, h) = fit_size(photo.dimensions(), 64, 8);
    let (photo_fit, crop) = resize_center_crop_recorded(&photo, w, h, FilterType::Lanczos3);
    assert_eq!((photo_fit.clone(), crop), resize_center_crop(&photo, w, h));
    assert_eq!(resize_center_crop(&mask, w, h), (apply_crop(&mask, &crop, MASK_FILTER), crop), "gray images get the linear filter");
    let mask_fit = apply_crop(&mask, &crop, MASK_FILTER);
    assert_eq!(mask_fit.dimensions(), (64, 64));

    // scale 0.8 -> 96x64, x offset 16: the subject lands at x 40..56, y 24..40
    assert_eq!((crop.scale, crop.x, crop.y), (0.8, 16, 0));
    let (mut inside, mut outside) = (0, 0);
    for (x, y, m) in mask_fit.enumerate_pixels() {
        let p = photo_fit.get_pixel(x, y).0;
        if m.0[0] > 230 {
            inside += 1;
            assert!(p[0] > 200 && p[2] < 60, "mask on ({x},{y}) but photo is {p:?}");
        } else if m.0[0] < 20 {
            outside += 1;
            assert!(p[0] < 60 && p[2] > 200, "mask off ({x},{y}) but photo is {p:?}");
        }
    }
    assert!(inside >= 12 * 12 && outside > 64 * 64 / 2, "inside {inside}, outside {outside}");
    assert!(mask_fit.get_pixel(48, 32).0[0] > 230 && mask_fit.get_pixel(10, 10).0[0] == 0);
}
