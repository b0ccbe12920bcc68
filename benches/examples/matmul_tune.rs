//! Times the GPU matmul on one adapter for a list of shapes and layouts, to
//! tune tile sizes: `FLAMINGO_MATMUL=register:8x8x16 cargo run --release
//! -p flamingo-benches --example matmul_tune -- ADAPTER [SHAPES]`.
//! SHAPES is a comma-separated list of MxKxN[:ab|abt|atb]; the default
//! covers the shapes of BENCHMARKS.md.

use std::time::Instant;

use flamingo_kernels::{Device, Matmul};

fn main() {
    let mut args = std::env::args().skip(1);
    let adapter: usize = args.next().and_then(|text| text.parse().ok()).unwrap_or(0);
    let shapes = args.next().unwrap_or_else(|| {
        "1024x1024x1024:ab,512x768x3072:ab,4096x256x256:ab,128x576x1536:abt,128x1536x576:abt,128x576x49152:abt,1024x1024x1024:abt,1024x1024x1024:atb".into()
    });
    let device = Device::gpu(adapter).expect("adapter opens");
    println!("{}", device.description());
    for shape in shapes.split(',') {
        let (sizes, layout) = shape.split_once(':').unwrap_or((shape, "ab"));
        let dims: Vec<usize> = sizes.split('x').map(|part| part.parse().unwrap()).collect();
        let (m, k, n) = (dims[0], dims[1], dims[2]);
        let (trans_a, trans_b) = match layout {
            "abt" => (false, true),
            "atb" => (true, false),
            _ => (false, false),
        };
        let a_shape = if trans_a { [k, m] } else { [m, k] };
        let b_shape = if trans_b { [n, k] } else { [k, n] };
        let a = device.from_f32(a_shape, (0..m * k).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect()).unwrap();
        let b = device.from_f32(b_shape, (0..k * n).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect()).unwrap();
        let spec = Matmul { trans_a, trans_b, ..Matmul::default() };
        let c = device.matmul(&a, &b, &spec).unwrap();
        device.synchronize().unwrap();
        drop(c);
        let flops = 2.0 * (m * n * k) as f64;
        let repeats = ((4e9 / flops) as usize).clamp(1, 50);
        // The best of three timings, since other processes share the cores.
        let mut seconds = f64::INFINITY;
        for _ in 0..3 {
            let start = Instant::now();
            for _ in 0..repeats {
                let c = device.matmul(&a, &b, &spec).unwrap();
                drop(c);
            }
            device.synchronize().unwrap();
            seconds = seconds.min(start.elapsed().as_secs_f64() / repeats as f64);
        }
        println!("{m}x{k}x{n} {layout}: {:.2} ms, {:.1} GFLOP/s", seconds * 1e3, flops / seconds / 1e9);
    }
}
