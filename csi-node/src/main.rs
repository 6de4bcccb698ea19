fn main() {
    println!("tandem-csi: under construction");
}
